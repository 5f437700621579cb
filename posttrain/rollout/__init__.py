"""Where rollouts are generated: one interface (:class:`~posttrain.rollout.base.RolloutBackend`), several
backends picked by ``rollout.backend`` and imported only when chosen (:func:`~posttrain.rollout.base.make_backend`)."""
