"""Device helpers and logging set-up."""
