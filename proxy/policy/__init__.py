"""Who may do what, how much and how fast: authentication (keys, JWT, JWKS), tenancy, the
SQL guard, admission (rates, slots, the fair queue) and idempotency.  No database I/O and
no HTTP (an import-linter contract)."""
