"""An exact-teacher world: per-prompt Gaussian mixtures with a closed-form teacher, in which the project's own loss,
training and sampling code must converge to a known answer (docs/exact_world.md).

- `world`: the mixture, its closed-form guided velocity, and the metrics (sliced W2, mode accuracy, mode weights).
- `networks`: `ExactTeacher` (the closed form behind the FLUX transformer's call signature) and `ExactWorldNet`
  (the student: a FLUX-signature MLP).
- `train`: `training.Trainer` fed by the world, and the entry scripts' method classes with the world's networks.
- `evaluate`: sampling through the FLUX pipelines' own sampling loops, and scoring against the teacher's ODE.
"""
