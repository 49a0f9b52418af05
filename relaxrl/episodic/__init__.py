"""Multi-turn episode training (DAgger and its baselines): the loop, and its in-process and Serve bindings."""
