"""Data preparation: readers, cleaning, quality filters, dedup, split and statistics (`antimatter prepare`)."""

# the split names, from prepare's folders through tokenize's shards to training and eval
SPLITS = ("train", "val")
