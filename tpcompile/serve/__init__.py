"""`tpcompile serve`: an OpenAI-compatible HTTP server over the sharded generation engines.

    tpcompile serve model=llama_tiny tp=2 server.port=8000
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"model": "llama_tiny", "prompt": "Once upon a time", "max_tokens": 16}'

The tp workers start once; a scheduler thread batches requests onto the rows of the KV cache (scheduler.py),
FastAPI on uvicorn answers HTTP (app.py), prometheus-client counts (metrics.py). SIGTERM (or Ctrl-C): no new
connections, streams in flight finish within server.drain_s, then the workers stop.
"""
import json
import logging
import signal
import socket
import sys
import time
from pathlib import Path


def serve(job) -> dict:
    """an OpenAI-compatible HTTP server over the generation artifact (continuous batching): server.host,
    server.port"""
    from tpcompile.api import Artifact
    from tpcompile import pipeline
    s, r = job.server, job.runtime
    path = pipeline.build_generation(job).path  # artifact=DIR: that one, as it is
    artifact = Artifact(path)
    spec = artifact.manifest.generation
    import uvicorn

    from tpcompile.serve.app import Served, make_app
    from tpcompile.serve.metrics import Metrics
    from tpcompile.serve.scheduler import Scheduler
    from tpcompile.tokenizer import eos_ids, tokenizer_for
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound here, so port 0 gets a port we can print
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((s.host, s.port))
    name = s.model_name or job.model.name
    log = _request_log()
    session = artifact.session(start_timeout_s=r.start_timeout_s, call_timeout_s=r.call_timeout_s,
                               heartbeat_timeout_s=r.heartbeat_timeout_s, log_dir=_worker_logs(),
                               max_restarts=r.max_restarts, collectives=r.collectives)
    t0 = time.perf_counter()
    with session:
        scheduler = Scheduler(session, metrics=Metrics(), max_queue=s.max_queue, step_timeout_s=s.step_timeout_s,
                              warm_timeout_s=r.call_timeout_s, log=log, decode_steps=s.decode_steps)
        scheduler.start()
        app = make_app(scheduler, Served(tokenizer_for(path), name, vocab=spec["vocab_size"], max_seq=spec["max_seq"],
                                         max_tokens=s.max_tokens, stop_ids=tuple(eos_ids(path, job.generation.eos_token_id))))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=s.drain_s,
                                               lifespan="off"))
        host, port = sock.getsockname()[:2]
        print(f"serving {name} (tp={artifact.tp}, max_batch={spec['max_batch']}, max_seq={spec['max_seq']}) on "
              f"http://{host}:{port} after {time.perf_counter() - t0:.1f} s; artifact {path}", flush=True)
        # uvicorn re-raises the signal that stopped it once it has drained; a no-op handler takes it, so the
        # workers are stopped below and the command ends normally
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run(sockets=[sock])
        finally:
            scheduler.close(timeout_s=s.step_timeout_s)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return {"artifact": str(path), "url": f"http://{host}:{port}", "restarts": session.group.restarts}


def _request_log():
    """One JSON line per request on stderr (logger tpcompile.serve)."""
    logger = logging.getLogger("tpcompile.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return lambda record: logger.info(json.dumps(record))


def _worker_logs() -> str | None:
    """Per-rank logs next to the job's record under Hydra; else the launcher's temp dir."""
    from hydra.core.hydra_config import HydraConfig
    return str(Path(HydraConfig.get().runtime.output_dir) / "workers") if HydraConfig.initialized() else None
