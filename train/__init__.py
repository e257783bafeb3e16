"""Training of GMR checkpoints: SFT, contrastive (InfoNCE) and the unified weight x direction
objective, LoRA (peft) or full fine-tuning, single process or torchrun DDP. See README.md."""
