"""The batch runtime: workers, leases, the checkpoint transaction."""
