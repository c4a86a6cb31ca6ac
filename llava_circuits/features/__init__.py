"""Feature discovery: capture sparse transcoder features on a benchmark, label answers GOOD / BAD, find the
features that separate them (with a real test), map them to MLP neurons, and steer them. See docs/features.md."""
