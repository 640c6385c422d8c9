"""DDP communication hooks: the hook functions (:mod:`.hooks`), the exchange they share
(:mod:`.exchange`), their plain state objects (:mod:`.state`) and the low-rank mean of
non-Dion matrices (:mod:`.lowrank`)."""
