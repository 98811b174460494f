"""megaclip.loss"""
