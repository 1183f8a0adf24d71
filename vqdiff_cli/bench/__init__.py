"""`vqdiff bench`: speed measurements of vqdiff, side by side with diffusers on the same weights."""
