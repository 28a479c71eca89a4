"""Evaluation: the ShapesWorld scorer, video metrics (PSNR, SSIM, flicker), autoencoder eval."""
