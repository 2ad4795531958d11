"""Many runs: seeded sweeps, finished runs grouped over seeds, what their numbers say, and the report."""
