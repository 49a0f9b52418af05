"""DAgger's in-process loop (bench, fast tests) and the multi-turn config schemas; runs go through relaxrl/driver.py."""
