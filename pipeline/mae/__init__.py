"""Masked-autoencoder pretraining (``train.objective=mae``) as a stage of the engine; the model is
:mod:`pipeline.model.mae`."""
