"""Who may do what, how much and how fast: admission (rates and slots) for now; auth,
tenancy, the guard and idempotency move here with the layout change (issue 22)."""
