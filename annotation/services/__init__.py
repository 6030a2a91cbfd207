"""Writes. One module per entity; every public function is keyword-only, typed and atomic."""
