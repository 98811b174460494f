"""megaclip.pipeline"""
