"""A fully offline toy text-to-image world scored the way GenEval scores (generator, analytic detector, scorer)."""
