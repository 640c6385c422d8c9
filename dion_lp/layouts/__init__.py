"""Where a matrix lives and how its products are reduced: whole on each rank
(:mod:`.local`, optionally averaged over replicas) or FSDP2 shards (:mod:`.sharded`).
:mod:`.placement` says which rows of a parameter this rank holds. Internal."""
