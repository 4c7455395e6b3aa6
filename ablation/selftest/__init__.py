"""`ablation selftest`: the minutes a GPU node spends checking every CUDA path of the harness before a sweep spends its
GPU-hours, and the same checks on a CPU in CI (tiny settings, gloo). A top-level concern: it imports the stages
(norms, data, train, sweep); nothing imports it back but the CLI. records.py is torch-free (the sweep reads it);
cuda.py holds every CUDA-only call; docs/selftest.md lists the checks and their tolerances."""
