"""Update rules: Dion (:mod:`.dion`, written once over a layout) and the element-wise
AdamW / Lion (:mod:`.elementwise`). Internal."""
