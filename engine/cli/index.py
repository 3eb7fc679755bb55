"""``netid index rebuild|status``: the duplicate search's face index in the data directory.

``rebuild`` builds the index afresh from the store (every active face template, opened with
the template key), retraining its quantiser on them, and writes it to ``DATA/index`` with its
position in the store's change log; a node started afterwards loads it and replays only the
log written since. ``status`` loads the index (as a node does at start-up) and prints what it
holds and whether a rebuild is advised (docs/register.md).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from typing import Any

__all__ = ["add_parser"]


def cmd_index(args: argparse.Namespace, open_store: Callable[[argparse.Namespace], Any]) -> int:
    import dataclasses

    import faiss

    from engine.crypto import TemplateCipher
    from engine.inference.models import DEFAULT_MODELS_DIR
    from engine.matching import DUPLICATE_FMR, FaissDuplicateSearch, TemplateSealer
    from engine.matching.calibration import ScoreModel

    faiss.omp_set_num_threads(args.threads)
    store, cfg = open_store(args)
    shape = {k: v for k, v in (("train_min", args.train_min), ("nlist", args.nlist), ("codes", args.codes)) if v is not None}
    cfg = dataclasses.replace(cfg, face_index=dataclasses.replace(cfg.face_index, **shape))
    try:
        scores = ScoreModel.load(cfg.models_dir or DEFAULT_MODELS_DIR)
        search = FaissDuplicateSearch(
            store, TemplateSealer(TemplateCipher.load_or_create(cfg.template_key_file)), dim=args.dim,
            threshold=scores.threshold("face", DUPLICATE_FMR), config=cfg.face_index, directory=cfg.index_dir,
        )
        if args.action == "rebuild":
            print(json.dumps(search.rebuild()))
        else:
            search.load()
            print(json.dumps({**search.status(), "index_bytes": search.index.nbytes()}))
    finally:
        store.close()
    return 0


def add_parser(sub, common: Callable, open_store: Callable) -> None:
    """The ``index`` command; ``open_store(args)`` gives ``(store, EngineConfig)``."""
    i = sub.add_parser("index", help="the duplicate search's face index: rebuild (and retrain) it, or show its status")
    i.add_argument("action", choices=["rebuild", "status"])
    common(i)
    i.add_argument("--threads", type=int, default=2, help="FAISS threads while training and adding")
    i.add_argument("--dim", type=int, default=128, help="face template dimension (SFace: 128)")
    i.add_argument("--train-min", type=int, default=None, help="face templates from which the index is trained (IVF)")
    i.add_argument("--nlist", type=int, default=None, help="IVF lists (default: half the square root of the templates)")
    i.add_argument("--codes", default=None, help="FAISS code of the IVF lists (default PQ64x4fs)")
    i.set_defaults(func=functools.partial(cmd_index, open_store=open_store))
