"""megaclip.tokenizer"""
