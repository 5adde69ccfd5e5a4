"""Tables and figures. The only package of hasched that imports matplotlib.

``sensitivity`` draws the campaign figures (paper Figures 4-6); ``search`` the schedule
search figures (Figures 7-10).
"""
