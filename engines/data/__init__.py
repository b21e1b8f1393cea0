"""Images in: decoding image files and walking dataset folders (images), synthetic defects (defects) and the synthetic
line that plants them in rendered frames (synthline). numpy and OpenCV only: the daemon's ingest decodes with
`images` and its synthetic camera renders with `synthline`, so nothing here may need torch."""
