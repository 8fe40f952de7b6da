"""Memory accounting: live activation bytes per op, and the OS's view (peak RSS)."""
