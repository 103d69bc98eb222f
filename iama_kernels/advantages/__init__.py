"""Order statistics, first variations, group values and advantages."""
