import cmatrix as cm

cl = cm.init()
raise ValueError("the job itself is broken")
