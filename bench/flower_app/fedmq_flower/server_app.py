"""ServerApp: FedAvg over all clients, weighted by samples; centralized evaluation on the
reference test set after every round, one JSON line per round appended to ``out-path``:
``{"round", "start", "end", "accuracy", "loss", "updates"}`` (``time.time()`` stamps;
``start`` is taken once every client is connected and the round's messages are built,
``end`` after aggregation and evaluation).
"""

from __future__ import annotations

import json
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedmq_flower.task import build_model, evaluate, load_test

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that remembers when each round's training messages were sent."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.round_start: dict[int, float] = {}
        self.updates: dict[int, int] = {}

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.round_start[server_round] = time.time()
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.updates[server_round] = sum(1 for m in replies if not m.has_error())
        return super().aggregate_train(server_round, replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = context.run_config
    rounds, clients = int(run["num-server-rounds"]), int(run["num-clients"])
    out_path, test = str(run["out-path"]), load_test(str(run["data-path"]))
    model = build_model(int(run["model-seed"]))
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                           min_available_nodes=clients)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        scores = evaluate(model, test)
        row = {"round": server_round, "start": strategy.round_start.get(server_round), "end": time.time(),
               "updates": strategy.updates.get(server_round, 0), **scores}
        with open(out_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return MetricRecord(scores)

    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                   train_config=ConfigRecord({"lr": float(run["lr"])}), evaluate_fn=central_evaluate)
