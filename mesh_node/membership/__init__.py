"""Membership: who is in the mesh, what each node holds, who is alive (SWIM/Lifeguard)."""
