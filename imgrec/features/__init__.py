"""Feature extractors: colour histogram, perceptual hashes, deep embedding."""
