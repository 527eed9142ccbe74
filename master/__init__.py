"""fedmq.master."""
