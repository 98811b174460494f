"""megaclip.checkpoint"""
