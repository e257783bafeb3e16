"""Prometheus metrics of the server (one registry per app, so tests can run several)."""

from __future__ import annotations

from dataclasses import dataclass

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class Metrics:
    registry: object
    requests: object  # counter by endpoint and status
    latency: object  # histogram by endpoint
    pairs: object  # counter of scored pairs
    tokens: object  # counter of decoder tokens run
    batches: object  # counter of engine batches
    images: object  # counter of images by source: encoded (vision tower) or cache
    batch_fill: object  # histogram of padding efficiency per engine round
    round_pairs: object  # histogram of pairs per engine round
    queue_pairs: object  # gauge: pairs waiting
    in_flight: object  # gauge: requests being handled

    @classmethod
    def create(cls) -> "Metrics":
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = CollectorRegistry()
        return cls(
            registry=r,
            requests=Counter("gmr_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r),
            latency=Histogram("gmr_request_seconds", "request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r),
            pairs=Counter("gmr_pairs", "(query, document) pairs scored", registry=r),
            tokens=Counter("gmr_decoder_tokens", "tokens run through the decoder (shared prefixes once)", registry=r),
            batches=Counter("gmr_engine_batches", "decoder batches run", registry=r),
            images=Counter("gmr_images", "distinct images of an engine round by source: encoded (the vision tower) "
                           "or cache (--image-cache-mb / --image-cache-size)", ["source"], registry=r),
            batch_fill=Histogram("gmr_batch_fill", "real / padded tokens of an engine round",
                                 buckets=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0), registry=r),
            round_pairs=Histogram("gmr_round_pairs", "pairs scored together in one engine round (across requests)",
                                  buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r),
            queue_pairs=Gauge("gmr_queue_pairs", "pairs waiting for the engine", registry=r),
            in_flight=Gauge("gmr_requests_in_flight", "requests being handled", registry=r),
        )

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
