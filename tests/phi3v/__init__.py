"""Tests of phiclip's Phi-3-vision image path (a package, so that module names stay unique)."""
