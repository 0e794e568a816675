"""Data preparation: readers, cleaning, quality filters, dedup, split and statistics (`antimatter prepare`)."""
