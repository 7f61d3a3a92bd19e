//! Reports: PNG images and grids, plots, JSON, HTML.
