"""The tiling step: from a slide to a tile store at an exact µm/px.

* :mod:`.grid`: tile-grid geometry in level-0 pixels (pure, no I/O);
* :mod:`.tissue`: tissue masks and the "why no tissue" report from an RGB thumbnail (pure);
* :mod:`.jpeg_scaled`: DCT-domain scaled decoding of JPEG-tiled pyramid levels;
* :mod:`.tiler`: reads regions, resamples them to the target µm/px and writes the store.
"""
