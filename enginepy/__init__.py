"""enginepy: a fast, faithful MusicGen inference engine."""
