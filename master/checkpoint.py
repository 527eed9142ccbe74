"""The master core's durable state: what a checkpoint holds and how a restarted core takes it back.

Written after every aggregation (before the new version is published): the model
and its version, the round counter and job phase, the strategy's state, the applied
update ids, the registry of slaves, the history and the rejection counts. The shell
adds its own parts (replay table, next sequence number) beside them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from .job import decode_tree, encode_tree
from .phase import JobPhase

if TYPE_CHECKING:
    from .core import MasterCore


def snapshot(core: MasterCore) -> dict[str, Any]:
    model = core.store.checkpoint()
    return {
        "job": core.cfg.job, "run": core.run, "version": model["version"], "round": core.rounds.number, "state": core.phase.state,
        "params": model["params"],
        "strategy": encode_tree(core.strategy.state_dict()),
        "applied": core.ledger.applied,
        "slaves": core.registry.checkpoint(),
        "history": core.history,
        "rejected": core.rejections.by_reason,
        "downlink": core.publisher.checkpoint(),
        "contributions": core.contributions,
    }


def restore(core: MasterCore, state: Mapping[str, Any]) -> None:
    core.run = state.get("run", core.run)  # checkpoints before runs existed: the shell's new one
    core.store.restore(state["version"], state["params"])
    core.strategy.load_state_dict(decode_tree(state["strategy"]))
    core.rounds.number = state["round"]
    core.phase = JobPhase(state["state"])
    core.ledger.applied = dict(state["applied"])
    core.registry.restore(state["slaves"])
    core.history = list(state["history"])
    core.rejections.restore(state["rejected"])
    core.publisher.restore(state.get("downlink"))
    core.contributions = dict(state.get("contributions", {}))
