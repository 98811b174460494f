"""megaclip.model"""
