"""fedmq: federated training of PyTorch models over MQTT with signed CBOR messages."""

__version__ = "0.1.0"
