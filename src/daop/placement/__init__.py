"""Where experts live: budgets, the placement table, cost model and policies (pure decisions)."""
