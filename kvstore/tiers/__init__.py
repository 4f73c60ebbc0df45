"""Storage tiers: host memory (DRAM) and SSD; the store moves blocks between them."""
