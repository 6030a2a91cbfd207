"""HTML views: thin functions that parse input, call one service or selector, and render."""
