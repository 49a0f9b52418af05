"""DAgger's in-process loop (bench, fast tests), the multi-turn config schemas and what a multi-turn
run adds to the one driver (run.py); runs go through relaxrl/driver.py."""
