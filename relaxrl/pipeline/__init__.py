"""Stage pipelines: sequential domain stages, a checkpoint registry of domain teachers, and MOPD stages."""
