"""The ACCORD coupling testbed: a synthetic world, judges, a tiny base text-to-image model and
the fine-tuning arms that measure concept coupling (README: "Does ACCORD help?")."""
