"""Prometheus metrics of the server, in a registry of its own (GET /metrics renders it).

    tpcompile_time_to_first_token_seconds     histogram  arrival -> first token (queue + prefill)
    tpcompile_time_per_output_token_seconds   histogram  (last token - first token) / (tokens - 1), per request
    tpcompile_e2e_request_latency_seconds     histogram  arrival -> last token
    tpcompile_queue_time_seconds              histogram  arrival -> a row is free for it
    tpcompile_running_rows                    gauge      rows of the KV cache in use (prefilling or decoding)
    tpcompile_queue_length                    gauge      requests waiting for a row
    tpcompile_prompt_tokens_total             counter    prompt tokens prefilled
    tpcompile_generation_tokens_total         counter    tokens generated
    tpcompile_errors_total{kind}              counter    bad_request | queue_full | unavailable | worker | disconnect
"""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("tpcompile_time_to_first_token_seconds", "Time to first token", buckets=LATENCY,
                              registry=r)
        self.tpot = Histogram("tpcompile_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=PER_TOKEN, registry=r)
        self.e2e = Histogram("tpcompile_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=LATENCY, registry=r)
        self.queue_time = Histogram("tpcompile_queue_time_seconds", "Time waiting for a row", buckets=LATENCY,
                                    registry=r)
        self.running = Gauge("tpcompile_running_rows", "Rows in use", registry=r)
        self.queued = Gauge("tpcompile_queue_length", "Requests waiting for a row", registry=r)
        self.tokens_in = Counter("tpcompile_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.tokens_out = Counter("tpcompile_generation_tokens", "Tokens generated", registry=r)
        self.errors = Counter("tpcompile_errors", "Failed requests by kind", ["kind"], registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
