"""Stage 5, io: files on a user's path, from every process of a job: checkpoints and PEFT files."""
