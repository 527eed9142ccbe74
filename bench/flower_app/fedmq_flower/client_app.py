"""ClientApp: one local training per message, like a fedmq slave's round.

``slowdown`` (node config, default 1.0) stretches local training as fedmq's
``[slave] slowdown`` does: after training, sleep (slowdown - 1) x training seconds.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmq_flower.task import build_model, load_partition, train

app = ClientApp()


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    run, node = context.run_config, context.node_config
    model = build_model(int(run["model-seed"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    dataset = load_partition(str(run["data-path"]), int(node["partition-id"]))
    server_round = int(msg.content["config"]["server-round"])
    metrics = train(model, dataset, epochs=int(run["local-epochs"]), batch_size=int(run["batch-size"]),
                    lr=float(run["lr"]), seed=server_round)  # fedmq: slave seed 0 * 1_000_003 + round
    slowdown = float(node.get("slowdown", 1.0))
    if slowdown > 1.0:
        time.sleep((slowdown - 1.0) * metrics["seconds"])
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": metrics["train_loss"], "num-examples": len(dataset)}),
    })
    return Message(content=content, reply_to=msg)
