"""The composition root: assemble an engine from an :class:`EngineConfig`, and run it.

``build_engine`` is the one place that picks the implementation behind each seam
(store, session state and quotas, matching, inference) from the configuration: state in
this process, or on Redis and the PostgreSQL store when ``state_url`` names one.
``run_engine`` loads the duplicate search, warms the models, serves the wire protocol
and, if configured, the metrics endpoint. ``task_status`` reports a
:class:`Running` handle with the bound ports once the engine is ready. On
:meth:`Running.drain` (the CLI calls it on SIGTERM/SIGINT) the engine stops
accepting, answers every request in flight, and returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import trio

from engine.matching.calibration import ScoreModel
from .config import EngineConfig
from .crypto import EngineKeys, TemplateCipher
from engine.inference.extractors import Extractors, onnx_extractors
from .flows import Context, Engine
from .inference import local_inference
from .matching import DUPLICATE_FMR, FaissDuplicateSearch, NoDuplicateSearch, StoreMatcher, TemplateSealer
from engine.ops.metrics import Metrics, serve_http
from engine.server.listener import Server, open_listeners
from .state import MemoryQuotas, MemorySessionState
from .store import Store, open_store

log = logging.getLogger("engine.app")

__all__ = ["Running", "build_engine", "run_engine"]


@dataclass
class Running:
    engine: Engine
    server: Server
    port: int
    metrics_port: int | None

    def drain(self) -> None:
        """Stop accepting; ``run_engine`` returns once the requests in flight are answered."""
        self.server.drain()


def build_engine(
    config: EngineConfig,
    *,
    store: Store | None = None,
    extractors: Extractors | None = None,
    scores: Any = None,
    metrics: Metrics | None = None,
) -> Engine:
    """An engine on ``config``: the store named by ``config.store_location`` (unless one
    is given), session state and quotas in this process or, with ``config.state_url``, on
    Redis and PostgreSQL (shared by many nodes), 1:1 matching through the store, FAISS duplicate
    search (if configured), and the local models (ONNX unless ``extractors`` are given)."""
    import faiss

    faiss.omp_set_num_threads(config.intra_op_threads)  # process-wide; FAISS must not fight the models for cores
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = store or open_store(config.store_location)
    templates = TemplateSealer(TemplateCipher.load_or_create(config.template_key_file))
    owns_extractors = extractors is None
    if extractors is None:
        extractors = onnx_extractors(
            config.models_dir,
            intra_op_threads=config.intra_op_threads,
            check_challenge=config.challenge.check,
            challenge_processes=config.challenge_batch.workers,
            challenge_kind=config.challenge.kind,
            model_processes=config.model_processes,
            shared_processes=config.shared_processes,
        )
    scores = scores if scores is not None else ScoreModel.load(config.models_dir)
    metrics = metrics or Metrics()
    if config.state_url is None:
        quotas = MemoryQuotas()
        state = MemorySessionState(quotas)
    else:
        from .state.redis import open_shared_state

        state, quotas = open_shared_state(config.state_url, config.store_location, cpu=metrics.layer_cpu)
    duplicates = (
        FaissDuplicateSearch(store, templates, dim=extractors.face_dim, threshold=scores.threshold("face", DUPLICATE_FMR),
                             config=config.face_index, directory=config.index_dir)
        if config.duplicate_search
        else NoDuplicateSearch()
    )
    ctx = Context(
        config=config,
        store=store,
        state=state,
        quotas=quotas,
        matcher=StoreMatcher(store, templates, scores, face_dim=extractors.face_dim, voice_dim=extractors.voice_dim,
                             cpu=metrics.layer_cpu),
        duplicates=duplicates,
        inference=local_inference(extractors, (config.face_batch, config.voice_batcher, config.challenge_batch), metrics=metrics),
        keys=EngineKeys.load_or_create(config.data_dir),
        templates=templates,
        scores=scores,
        metrics=metrics,
        clock=time.time,
    )
    return Engine(ctx, extractors=extractors, owns_extractors=owns_extractors)


async def run_engine(engine: Engine, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    config = engine.config
    server = Server(engine)
    async with trio.open_nursery() as nursery:
        metrics_port = None
        if config.metrics_port is not None:

            async def metrics_http(task_status=trio.TASK_STATUS_IGNORED) -> None:
                await serve_http(
                    engine.metrics,
                    host=config.metrics_host,
                    port=config.metrics_port,
                    ready=lambda: engine.ready and engine.reachable and not server.draining,
                    task_status=task_status,
                )

            metrics_port = await nursery.start(metrics_http)
        await nursery.start(engine.run)
        listeners = await open_listeners(config)
        served = trio.Event()

        async def serving(task_status=trio.TASK_STATUS_IGNORED) -> None:
            try:
                await server.serve(listeners, task_status=task_status)
            finally:
                served.set()

        port = await nursery.start(serving)
        log.info("engine ready on %s:%d", config.host, port)
        task_status.started(Running(engine, server, port, metrics_port))
        await served.wait()  # after a drain, once every connection has finished
        nursery.cancel_scope.cancel()
